from latentlab.reproduce import main

main()
